<?php
// Publishes one update through Symfony's Mercure component, as a Symfony
// app does: php publish.php HUB_URL JWT DATA PRIVATE(0|1) TOPIC [TOPIC...]
// Prints the id the hub answered.
require '/usr/share/php/Symfony/Component/Mercure/autoload.php';
require '/usr/share/php/Symfony/Component/HttpClient/autoload.php';

use Symfony\Component\Mercure\Hub;
use Symfony\Component\Mercure\Jwt\StaticTokenProvider;
use Symfony\Component\Mercure\Update;

[, $url, $jwt, $data, $private] = $argv;
$topics = array_slice($argv, 5);
$hub = new Hub($url, new StaticTokenProvider($jwt));
echo $hub->publish(new Update($topics, $data, $private === '1', null, 'book', 2500));
